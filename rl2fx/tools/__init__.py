"""Tools as environments: each module here defines ``env_step(sample)`` (:mod:`rl2fx.envs`)."""
