"""Run by test_serve_gpu_scheduling.py in its own process: a real local Ray declaring 2 GPUs this machine does not
have, and Serve replicas deployed with the options ``ray_ft.serving.build_app`` gives a ``num_gpus: 1`` endpoint.

The replica class is a probe reporting what Ray assigned it (the engine itself needs a real GPU); the options,
resources and scheduling are Ray Serve's own. Prints one ``RESULT {json}`` line.
"""

from __future__ import annotations

import json
import time


class Probe:
    def __call__(self, request) -> dict:
        import os

        import ray

        return {
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "assigned": ray.get_runtime_context().get_assigned_resources(),
            "pid": os.getpid(),
        }


def main() -> None:
    import ray
    from ray import serve

    from ray_ft.serving.app import replica_options
    from ray_ft.serving.args import ServeArgs

    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False)
    settings = ServeArgs(models=["unused"], num_gpus=1, num_cpus=0.5, min_replicas=2, max_replicas=3)
    options = replica_options(settings)
    handle = serve.run(serve.deployment(Probe).options(**options).bind(), name="gpu", route_prefix=None)
    seen: dict[int, dict] = {}
    deadline = time.monotonic() + 120
    while len(seen) < 2 and time.monotonic() < deadline:
        reply = handle.remote(None).result()
        seen[reply["pid"]] = reply
    status = serve.status().applications["gpu"].deployments["Probe"]
    print("RESULT " + json.dumps({"options": options, "replicas": list(seen.values()),
                                  "replica_states": dict(status.replica_states)}), flush=True)  # fmt: skip
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
