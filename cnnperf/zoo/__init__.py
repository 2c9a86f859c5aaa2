"""Models, data sets and optimizers that the doctor and the profiler both train with (neither owns them).

- :mod:`cnnperf.zoo.models`: :func:`~cnnperf.zoo.models.build_model` over :data:`~cnnperf.zoo.models.MODELS`.
- :mod:`cnnperf.zoo.data`: :func:`~cnnperf.zoo.data.load_data` over :data:`~cnnperf.zoo.data.DATASETS`.
- :mod:`cnnperf.zoo.optim`: :func:`~cnnperf.zoo.optim.make_optimizer`, :func:`~cnnperf.zoo.optim.make_scheduler`.

May import cnnperf's ops and layers, never a tool (doctor, profiler, benchmarks).
"""
