"""DICOM: series reading, DICOM SEG writing/reading and DICOMweb push."""
