# syntax=docker/dockerfile:1.7
# A task image: the fedfleet services image plus YOUR task package and its Python
# dependencies. Point an FLJob at it with spec.actors.image; its coordinator, selectors and
# aggregators then import spec.task.ref from here (no spec.task.path needed).
#
# The build context is your task's folder: every file in it is copied to /opt/fedfleet/task
# (on PYTHONPATH), and a requirements.txt there is pip-installed. For the shipped examples:
#
#   docker build -f deploy/docker/task.Dockerfile -t REGISTRY/acme/linreg-task:0.1.0 \
#       examples/custom-numpy
#   docker build -f deploy/docker/task.Dockerfile -t REGISTRY/acme/mnist-cnn:0.1.0 \
#       --build-arg PIP_EXTRA_INDEX_URL=<PyTorch's CPU-only wheel index> examples/pytorch-cnn
#
# (buildah: `buildah build -f deploy/docker/task.Dockerfile -t ... examples/custom-numpy`.)
# Build args:
#   SERVICES_IMAGE       the services image to start from (deploy/docker/Dockerfile.services);
#                        keep it at the version of the operator that runs your jobs
#   PIP_PACKAGES         more packages to install, space-separated (e.g. "scipy==1.14.1")
#   PIP_EXTRA_INDEX_URL  an extra package index for pip (e.g. CPU-only PyTorch wheels)
ARG SERVICES_IMAGE=fedfleet/services:0.1.0
FROM ${SERVICES_IMAGE}
ARG PIP_PACKAGES=""
ARG PIP_EXTRA_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# The services image runs as nobody; installing needs root, the image runs as nobody again.
USER 0:0
COPY . /opt/fedfleet/task
RUN set -eu; \
    cd /opt/fedfleet/task; \
    extra=""; \
    if [ -n "${PIP_EXTRA_INDEX_URL}" ]; then extra="--extra-index-url ${PIP_EXTRA_INDEX_URL}"; fi; \
    if [ -f requirements.txt ]; then pip install ${extra} -r requirements.txt; fi; \
    if [ -n "${PIP_PACKAGES}" ]; then pip install ${extra} ${PIP_PACKAGES}; fi; \
    find /opt/fedfleet/task -name __pycache__ -prune -exec rm -rf {} +; \
    chmod -R a+rX /opt/fedfleet/task
# The task's modules import as `package.module` from here; data files in the folder are at
# /opt/fedfleet/task/... (e.g. evaluation.data: /opt/fedfleet/task/data/test.csv).
ENV PYTHONPATH=/opt/fedfleet/task
LABEL org.opencontainers.image.title="fedfleet task" \
      org.opencontainers.image.description="fedfleet actors with a user's FL task"
USER 65534:65534
WORKDIR /tmp
