"""The Kubeflow Pipelines (v2) shell around the sspo CLI: components, the pipeline, compile / run-local / submit /
schedule. Components are thin: they build a stage's argument list and run `sspo`; the logic lives in the library.

`IMAGE` and `CUDA_IMAGE` are the one place that names the container images the components run in (both built from
components/Dockerfile): the CUDA image for the steps that use GPUs (train, evaluate, and the TrainJob of a
multi-node training), the CPU image for the rest. `sspo pipeline compile --image REF --cuda-image REF` points a
compiled pipeline at other registries.
"""

from sspo import __version__

IMAGE = f"registry.example.com/ml/sspo:{__version__}"
CUDA_IMAGE = f"{IMAGE}-cuda"

# Every step reads and writes the object store with these credentials; they never travel as parameters.
S3_SECRET = "sspo-s3"
S3_SECRET_ENV = {key: key for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL",
                                      "AWS_DEFAULT_REGION")}
