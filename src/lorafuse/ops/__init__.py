"""Operations on adapters and checkpoints."""
