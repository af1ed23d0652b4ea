"""colearn_jax.train"""
