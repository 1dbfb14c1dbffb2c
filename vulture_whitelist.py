"""Names vulture (make lint) cannot see used: each group says who reads them.

vulture reads this file as code; a name written here counts as used. Add a name only with
the reader that vulture misses; code nobody reads is deleted, not listed.
"""
# ruff: noqa: B018
_ = object()

# pydicom: assigning a DICOM keyword on a Dataset makes the data element the file carries
_.SpecificCharacterSet, _.AcquisitionContextSequence, _.WaveformSequence, _.file_meta
_.WaveformAnnotationSequence, _.MediaStorageSOPClassUID, _.MediaStorageSOPInstanceUID
_.TransferSyntaxUID, _.ImplementationClassUID, _.ImplementationVersionName
_.StudyInstanceUID, _.SeriesInstanceUID, _.Modality, _.StudyID, _.AccessionNumber
_.SeriesNumber, _.InstanceNumber, _.ContentDate, _.StudyDate, _.ContentTime, _.StudyTime
_.AcquisitionDateTime, _.TimezoneOffsetFromUTC, _.PatientName, _.PatientID
_.PatientBirthDate, _.PatientAge, _.ReferringPhysicianName
_.ReferringPhysicianTelephoneNumbers, _.Manufacturer, _.ManufacturerModelName
_.DeviceSerialNumber, _.SoftwareVersions, _.InstitutionName, _.CodeValue
_.CodingSchemeDesignator, _.CodeMeaning, _.WaveformOriginality, _.NumberOfWaveformChannels
_.NumberOfWaveformSamples, _.SamplingFrequency, _.MultiplexGroupLabel, _.ChannelSourceSequence
_.ChannelSensitivity, _.ChannelSensitivityUnitsSequence, _.ChannelSensitivityCorrectionFactor
_.ChannelBaseline, _.ChannelSampleSkew, _.WaveformBitsStored, _.FilterLowFrequency
_.FilterHighFrequency, _.NotchFilterFrequency, _.ChannelDefinitionSequence
_.WaveformBitsAllocated, _.WaveformSampleInterpretation, _.WaveformPaddingValue
_.WaveformData, _.ConceptNameCodeSequence, _.NumericValue, _.MeasurementUnitsCodeSequence
_.ReferencedWaveformChannels

# commands/__init__.py HANDLERS: subcommands dispatched by "module:function" name
_.report, _.export, _.simulate, _.demo

# fields read by name: delineate.Conf (vars(self) in its check, getattr by wave name),
# measurements.Measurements (getattr over its fields), Settings (getattr(self, key.attr) over
# KEYS), the clock's ticket (asdict), outbox.Stats (asdict in ops/status.py)
_.p_offset_ms, _.qrs_onset_ms
_.pr_ms, _.qrs_ms, _.qtc_bazett_ms, _.qtc_fridericia_ms, _.p_axis_deg, _.t_axis_deg
_.cloud_service, _.wall_at_capture
_.updated_at, _.pruned_at, _.oldest_pending_age_s, _.pause_reason, _.last_package_stamp
_.last_package_disposition, _.last_package_at, _.last_seen

# ops/status.py's TypedDicts: keys of status.json and of `status --json`, written and
# printed as JSON documents, read by key by the engineer's tools and the tests
_.last_byte_age_s, _.running, _.status_age_s, _.frames_flowing, _.clock_source, _.checked_at

# hooks a library calls: sqlite3 (row_factory), socket/ssl methods the timed socket
# overrides, urllib3's pool and connection hooks, botocore's CredentialProvider, and the
# thread flag tests/conftest.py's leak check reads with getattr
_.row_factory
_.recv_into, _.sendall, _.do_handshake, _._new_conn, _.ConnectionCls
_.CANONICAL_NAME, _.load
_._allowed_to_leak

# what a capture or an upload observed, read by the tests that check the live path through it
# (FrameDecoder's counters, the simulator's bytes, the fetcher's and transport's counts,
# a certificate's issuer, a collision's requested key, a record's LUDB labels, the
# accuracy limits the bench and tests/functional/test_measure_accuracy.py share)
_.frames_rejected, _.wraps_from_timing, _.bytes_written, _.fetches, _.requests
_.issuer_cn, _.requested_key, _.fiducial, _.pacing, _.LIMITS, _.AXIS_LIMITS

# test seams the library offers, through which tests drive live code: the decoder's checksum
# hook (verify_payload_sum), its frame scan (find_frames), the drainer's executor
_.verify_payload_sum, _.find_frames, _.SynchronousExecutor

# the signup document's field order, which tests/unit/test_users.py holds it to
_.SIGNUP_FIELDS

# _Key.help: each key's one-line help, written where the key is declared
_.help
