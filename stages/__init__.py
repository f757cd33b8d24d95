"""The pipeline's stages: one entry point per stage of dvc.yaml; none imports another."""
