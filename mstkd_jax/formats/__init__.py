"""What practitioners bring and take away: face data file formats (image trees, RFW, .bin,
RecordIO, IJB, landmarks, groups files), alignment, and the prepare, convert and align
commands. data/ holds what training reads."""
