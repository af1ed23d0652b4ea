"""colearn_jax.models"""
