"""gradcam package."""
