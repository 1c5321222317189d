"""Fast paths of the reverse scan and of the estimators built on it: where speed lives.

Each module is one numeric method; none of them decides when it runs. The rules
that pick one (device, dtype, shape, constant or per-step coefficients, mask,
gradients) are all in :mod:`rl2fx.returns.scan`.

* :mod:`.loop`: the reference, ``T`` sequential steps;
* :mod:`.blocked`: the eager two-level blocked scan, in place, per-step or constant ``c``;
* :mod:`.gemm`: constant ``c`` on CPU, the in-block pass as one matrix product;
* :mod:`.masked`: a mask with constant ``c`` on CPU, weighted block sums, no packing;
* :mod:`.compiled`: the functional blocked scan (differentiable) and its ``torch.compile`` form;
* :mod:`.packed`: left-aligning each row's masked-in steps (pack / unpack);
* :mod:`.gae_const`: GAE and TD(λ) with constant ``gamma``, ``lamda`` on CPU;
* :mod:`.workspace`: per-thread scratch buffers and :func:`release_workspace`.

State kept between calls (everything else is recomputed per call):

* scratch buffers for large temporaries, per thread, each at most 64 MiB, freed
  when the thread ends or by :func:`rl2fx.returns.release_workspace`;
* small constant matrices (:mod:`.gemm`: ``16 x 16`` per discount and dtype, at most
  65 entries; :mod:`.masked`: a few ``16 x 16`` 0/1 matrices), for the process's life;
* compiled graphs (:mod:`.compiled`), one per device type and dtype, for the process's life.
"""
