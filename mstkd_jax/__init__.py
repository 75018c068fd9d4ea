"""MST-KD (Multiple Specialized Teachers Knowledge Distillation) in JAX/Flax."""
