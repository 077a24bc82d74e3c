"""The experiment configs (runnable documentation); `configs/` at the repository root links here."""
