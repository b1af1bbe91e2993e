"""Makes a running moto server check request signatures (used by s3-server.sh).

Creates an IAM user allowed to do everything, gives it an access key, then tells moto to
authenticate every later request. Only requests signed with that key are accepted from then
on; unknown keys get InvalidAccessKeyId, wrong secrets SignatureDoesNotMatch.

Usage: python s3-server-auth.py http://127.0.0.1:PORT
Prints: ACCESS_KEY_ID SECRET_ACCESS_KEY
"""

import json
import sys
import urllib.request

import boto3

USER = "tidemark-test"
ALLOW_ALL = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
}


def main() -> None:
    endpoint = sys.argv[1]
    # Authentication is still off at this point, so any key is accepted for these calls.
    iam = boto3.client(
        "iam",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="bootstrap",
        aws_secret_access_key="bootstrap",
    )
    iam.create_user(UserName=USER)
    iam.put_user_policy(
        UserName=USER, PolicyName="allow-all", PolicyDocument=json.dumps(ALLOW_ALL)
    )
    key = iam.create_access_key(UserName=USER)["AccessKey"]
    # From now on every request must be signed with a key moto knows.
    # A non-form content type, or the web framework swallows the body as form data.
    request = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth",
        data=b"0",
        method="POST",
        headers={"Content-Type": "text/plain"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        if response.status != 200:
            sys.exit(f"moto refused to enable authentication: HTTP {response.status}")
    print(key["AccessKeyId"], key["SecretAccessKey"])


if __name__ == "__main__":
    main()
