"""colearn_jax.losses"""
