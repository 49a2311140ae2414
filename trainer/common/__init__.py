"""What the training job and the tools both need; imports neither (see trainer/__init__.py)."""
