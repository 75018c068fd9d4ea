"""MXNet RecordIO (insightface train.rec + train.idx), read and written without MXNet.

codec.py: the record framing and MXNet's image record header; reader.py and writer.py: raw
records and the .idx; identities.py: the .identities.json names a .rec keeps beside it;
face_pack.py: insightface's training pack (header record, images, identity records) as
FaceRecords.
"""
