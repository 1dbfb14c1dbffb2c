"""The functional tier's S3 endpoint is a real HTTP server that boto3 signs requests for."""

import boto3


def test_moto_server_round_trip(s3_endpoint, s3_bucket):
    assert s3_endpoint.startswith("http://127.0.0.1:")
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.put_object(Bucket=s3_bucket, Key="ecg-reports/x.txt", Body=b"hello")
    body = client.get_object(Bucket=s3_bucket, Key="ecg-reports/x.txt")["Body"].read()
    assert body == b"hello"
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert keys == ["ecg-reports/x.txt"]
