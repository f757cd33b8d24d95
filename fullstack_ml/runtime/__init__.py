"""What the bento ships and the service imports: preprocessing, the model program and its
`model.json`, drift, and the service's HTTP edge, OpenAPI spec, metrics and request types.
Only the bento's packages (numpy, pandas, torch, whylogs, pydantic) and BentoML's serving
stack (uvicorn, prometheus_client); never bentoml itself (a test holds it to that)."""
