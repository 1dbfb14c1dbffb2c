"""What a capture becomes on disk: the record JSON, the PDF report, the DICOM copy, the patient
file and the package folder.
"""
