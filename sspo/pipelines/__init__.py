"""The Kubeflow Pipelines (v2) shell around the sspo CLI: components, the pipeline, compile / run-local / submit /
schedule. Components are thin: they build a stage's argument list and run `sspo`; the logic lives in the library.

`IMAGE` is the one place that names the container image every component runs in (built from components/Dockerfile);
`sspo pipeline compile --image REF` points a compiled pipeline at another registry.
"""

from sspo import __version__

IMAGE = f"registry.example.com/ml/sspo:{__version__}"
