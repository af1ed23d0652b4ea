"""colearn_jax.nn"""
