"""Creates an IAM user with one policy on the S3 test server and prints its access key.

The server started by s3-server.sh enforces authentication, and with it IAM policies: the
new user can do exactly what the policy allows (moto evaluates each request's action and
resource; it does not evaluate Condition blocks such as s3:prefix). Used to try a policy,
such as docs/iam/archiver-policy.json, before giving it to a production key.

Usage (with the server's environment loaded: eval "$(scripts/s3-server.sh env)"):

    $VENV/bin/python scripts/s3-server-user.py USER POLICY_FILE [--bucket B] [--prefix P]

    USER         a new user name (letters, digits and +=,.@_-)
    POLICY_FILE  an IAM policy document (JSON)
    --bucket B   replaces <BUCKET> in the policy
    --prefix P   replaces <PREFIX> in the policy (without leading or trailing /)

$VENV is the server's virtualenv, ~/.cache/tidemark/venv-moto (or $TIDEMARK_CACHE/venv-moto).
The endpoint comes from TIDEMARK_TEST_S3_ENDPOINT, the administrator's key from
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (as s3-server.sh env prints them).

Prints: ACCESS_KEY_ID SECRET_ACCESS_KEY
"""

import argparse
import json
import os
import re
import sys

import boto3
import botocore.exceptions


def fail(message: str) -> None:
    sys.exit(f"s3-server-user: error: {message}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Create an IAM user with one policy on the S3 test server."
    )
    parser.add_argument("user")
    parser.add_argument("policy_file")
    parser.add_argument("--bucket", help="replaces <BUCKET> in the policy")
    parser.add_argument("--prefix", help="replaces <PREFIX> in the policy")
    args = parser.parse_args()

    endpoint = os.environ.get("TIDEMARK_TEST_S3_ENDPOINT")
    if not endpoint:
        fail(
            "TIDEMARK_TEST_S3_ENDPOINT is not set; start the server and load its "
            'environment: scripts/s3-server.sh start && eval "$(scripts/s3-server.sh env)"'
        )
    if not re.fullmatch(r"[\w+=,.@-]{1,64}", args.user):
        fail(f"'{args.user}' is not a valid IAM user name")
    try:
        with open(args.policy_file, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        fail(f"cannot read the policy {args.policy_file}: {e.strerror}")
    if args.bucket is not None:
        text = text.replace("<BUCKET>", args.bucket)
    if args.prefix is not None:
        text = text.replace("<PREFIX>", args.prefix.strip("/"))
    left = sorted(set(re.findall(r"<[A-Z_]+>", text)))
    if left:
        fail(
            f"the policy still has the placeholder(s) {', '.join(left)}; "
            "give --bucket and --prefix"
        )
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        fail(f"{args.policy_file} is not valid JSON: {e}")

    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1")
    try:
        iam.create_user(UserName=args.user)
        iam.put_user_policy(
            UserName=args.user, PolicyName=f"{args.user}-policy", PolicyDocument=text
        )
        key = iam.create_access_key(UserName=args.user)["AccessKey"]
    except botocore.exceptions.NoCredentialsError:
        fail(
            "no administrator credentials: load the server's environment with "
            'eval "$(scripts/s3-server.sh env)"'
        )
    except botocore.exceptions.ClientError as e:
        error = e.response.get("Error", {})
        fail(f"the server refused: {error.get('Code')}: {error.get('Message')}")
    except botocore.exceptions.EndpointConnectionError:
        fail(f"cannot reach {endpoint}; is the server running (scripts/s3-server.sh status)?")
    print(key["AccessKeyId"], key["SecretAccessKey"])


if __name__ == "__main__":
    main()
