# syntax=docker/dockerfile:1
# Two images from one file (docker-compose.yml builds both):
#   target web:   the web tier (gunicorn + gevent); no TensorFlow in it.
#   target model: the model server, with the ImageNet weights of every zoo model baked in, so a
#                 container starts without downloading anything.
# Build arg TENSORFLOW picks the model tier's TensorFlow: tensorflow-cpu (default) or
# "tensorflow[and-cuda]" for NVIDIA GPUs (docker-compose.gpu.yml sets it). Either way at the version
# requirements.txt pins; the CUDA libraries come as pip wheels, so the host needs only the NVIDIA
# driver and the NVIDIA Container Toolkit.
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS base
WORKDIR /app
RUN useradd --create-home --uid 10001 app
COPY requirements-web.txt ./
RUN pip install --no-cache-dir -r requirements-web.txt

FROM base AS web
COPY settings.py web_server.py ./
COPY serving/ serving/
USER app
EXPOSE 5000
CMD ["python", "web_server.py"]

FROM base AS model
ARG TENSORFLOW=tensorflow-cpu
COPY requirements.txt ./
# requirements.txt with its tensorflow-cpu pin swapped for TENSORFLOW at the same version; the grep
# fails the build if requirements.txt no longer has the line this expects.
RUN sed "s/^tensorflow-cpu==/${TENSORFLOW}==/" requirements.txt > requirements-model.txt \
 && grep -qF "${TENSORFLOW}==" requirements-model.txt \
 && pip install --no-cache-dir -r requirements-model.txt
# Keras caches weights under $KERAS_HOME/models. The directory must belong to the user that runs the
# server: where it is not writable, Keras looks in /tmp/.keras instead and would download again.
ENV KERAS_HOME=/opt/keras
RUN install -d -o app /opt/keras
USER app
# Only what fetch_weights.py needs, so editing the rest of the code keeps this layer cached.
COPY serving/__init__.py serving/wire.py serving/zoo.py serving/
COPY scripts/fetch_weights.py scripts/
RUN python scripts/fetch_weights.py
COPY settings.py model_server.py ./
COPY serving/ serving/
COPY models/ models/
CMD ["python", "model_server.py"]
