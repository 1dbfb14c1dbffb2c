# ruff: noqa: SIM102  (the legacy code kept as it is written, nested ifs and all)
"""The legacy desktop app's own upload-log code (src/utils/cloud_uploader.py in
github.com/DivyansghDMK/merge), as it is, prints left out: what it checks before it uploads,
and how it logs an upload. Tests run it on the files this agent writes."""

from __future__ import annotations

import json
import os
from datetime import datetime


def is_file_already_uploaded(upload_log_path, file_path):
    """CloudUploader._is_file_already_uploaded."""
    try:
        filename = os.path.basename(file_path)
        if os.path.exists(upload_log_path):
            with open(upload_log_path) as f:
                log_data = json.load(f)
            for entry in log_data:
                logged_filename = os.path.basename(entry.get("local_path", ""))
                metadata_filename = entry.get("metadata", {}).get("filename", "")
                if logged_filename == filename or metadata_filename == filename:
                    if entry.get("result", {}).get("status") == "success":
                        return True
        return False
    except Exception:
        return False


def user_already_uploaded(upload_log_path, username, serial_number=""):
    """The check at the top of CloudUploader.upload_user_signup (True: it skips the user)."""
    try:
        if os.path.exists(upload_log_path):
            with open(upload_log_path) as f:
                log_data = json.load(f)
            for entry in log_data:
                metadata = entry.get("metadata", {})
                if metadata.get("type") == "user_signup":
                    if (metadata.get("username") == username or
                            (serial_number and metadata.get("serial_number") == serial_number)):
                        if entry.get("result", {}).get("status") == "success":
                            return True
    except Exception:
        pass
    return False


def log_upload(upload_log_path, file_path, result, metadata):
    """CloudUploader._log_upload: read the whole log, append, write it in place."""
    log_data = []
    if os.path.exists(upload_log_path):
        with open(upload_log_path) as f:
            log_data = json.load(f)
    log_data.append({"local_path": file_path, "uploaded_at": datetime.now().isoformat(),
                     "service": "s3", "result": result, "metadata": metadata})
    os.makedirs(os.path.dirname(upload_log_path), exist_ok=True)
    with open(upload_log_path, "w") as f:
        json.dump(log_data, f, indent=2)
