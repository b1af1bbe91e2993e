#!/bin/sh
# Creates the bucket Tidemark uses (TIDEMARK_BUCKET, default "tidemark"); succeeds if it
# exists already.
#
# LocalStack runs it when it is ready (docker-compose.yml mounts this directory at
# /etc/localstack/init/ready.d). It also works by hand against a LocalStack started without
# Docker:
#   LOCALSTACK_ENDPOINT=http://127.0.0.1:4566 sh localstack/init/ready.d/01-create-bucket.sh
set -eu
BUCKET="${TIDEMARK_BUCKET:-tidemark}"
ENDPOINT="${LOCALSTACK_ENDPOINT:-http://127.0.0.1:4566}"

if command -v awslocal >/dev/null 2>&1; then
    # Inside the LocalStack container.
    awslocal s3api head-bucket --bucket "$BUCKET" >/dev/null 2>&1 ||
        awslocal s3api create-bucket --bucket "$BUCKET" >/dev/null
else
    # LocalStack does not check signatures by default, so a plain PUT creates a bucket.
    code="$(curl -s -o /dev/null -w '%{http_code}' -X PUT "$ENDPOINT/$BUCKET")"
    case "$code" in
    200 | 409) ;;
    *)
        echo "creating bucket '$BUCKET' at $ENDPOINT failed: HTTP $code (is LocalStack running?)" >&2
        exit 1
        ;;
    esac
fi
echo "bucket '$BUCKET' is ready at $ENDPOINT"
