"""Options pytest must know however it is started (`pytest`, `pytest .`, `pytest benchmarks`, or
the checkout named from elsewhere): a root conftest.py is loaded in every case, where
benchmarks/conftest.py is not when only the root or its parent is named."""


def pytest_addoption(parser):
    parser.addoption("--enforce-eager", action="store_true", default=False,
                     help="benchmarks: every engine built with cuda_graphs=False (vLLM's flag), and the decode benchmark's "
                          "CUDA-graph-path figure not measured. The benchmarks run on CPU, where graphs are off by default anyway")
