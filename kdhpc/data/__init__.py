"""MRI data: file formats, masks, degradations and the embedded default dataset."""
