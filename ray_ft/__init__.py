"""ray-ft: fine-tune LLMs on Ray (Train + DeepSpeed, Tune), track with MLflow, serve with Ray Serve."""

__version__ = "0.1.0"
