"""colearn_jax.data"""
