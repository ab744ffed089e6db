"""Training data: the procedural shapes world (images, canonical captions, understanding Q&A)."""
