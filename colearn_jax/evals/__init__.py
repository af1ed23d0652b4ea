"""colearn_jax.evals"""
