"""colearn_jax.convert"""
