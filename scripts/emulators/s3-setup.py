"""Prepares a moto S3 server for the kiln-context tests.

Usage: s3-setup.py ENDPOINT BUCKET [KEY=FILE ...]   (split at the last `=`)

Creates an IAM user with full S3 access and its access key, the bucket and the objects (moto
does not check credentials yet), then turns authentication on through moto's
`/moto-api/reset-auth`: from then on every request must be signed (SigV4, checked by moto)
with a key of an IAM user. Prints the access key id, the secret key and the ARN of a role
that may read objects (for web-identity credentials), one a line.
"""

import json
import sys
import urllib.request

import boto3
from botocore.config import Config

endpoint, bucket, uploads = sys.argv[1], sys.argv[2], sys.argv[3:]
common = {"endpoint_url": endpoint, "region_name": "us-east-1"}

iam = boto3.client("iam", aws_access_key_id="setup", aws_secret_access_key="setup", **common)
iam.create_user(UserName="kiln")
key = iam.create_access_key(UserName="kiln")["AccessKey"]
policy = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
}
iam.put_user_policy(UserName="kiln", PolicyName="s3", PolicyDocument=json.dumps(policy))
# A role for web-identity (IRSA) credentials, allowed to read objects.
trust = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Principal": {"Federated": "arn:aws:iam::123456789012:oidc-provider/kiln.test"},
            "Action": "sts:AssumeRoleWithWebIdentity",
        }
    ],
}
role = iam.create_role(RoleName="kiln-ctx", AssumeRolePolicyDocument=json.dumps(trust))["Role"]
read = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "s3:GetObject", "Resource": "*"}],
}
iam.put_role_policy(RoleName="kiln-ctx", PolicyName="read", PolicyDocument=json.dumps(read))

s3 = boto3.client(
    "s3",
    aws_access_key_id=key["AccessKeyId"],
    aws_secret_access_key=key["SecretAccessKey"],
    config=Config(s3={"addressing_style": "path"}),
    **common,
)
s3.create_bucket(Bucket=bucket)
for upload in uploads:
    name, path = upload.rsplit("=", 1)
    s3.upload_file(path, bucket, name)

request = urllib.request.Request(
    endpoint + "/moto-api/reset-auth",
    data=b"0",
    headers={"Content-Type": "text/plain"},
    method="POST",
)
urllib.request.urlopen(request).read()

print(key["AccessKeyId"])
print(key["SecretAccessKey"])
print(role["Arn"])
