import pytest


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray runtime with more logical CPUs than cores (driver + workers fit on 2 cores)."""
    import ray

    ray.init(num_cpus=4, log_to_driver=True)
    yield ray
    ray.shutdown()
