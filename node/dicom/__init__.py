"""The DICOM edge: the C-STORE listener, the sender, instance files and their rows.

- :mod:`node.dicom.scp`: C-ECHO and C-STORE service (pynetdicom), the calling-AE check;
- :mod:`node.dicom.scu`: C-STORE of stored files to a peer (the outbox's deliveries);
- :mod:`node.dicom.storage`: one file per instance under the storage root, written atomically;
- :mod:`node.dicom.catalog`: the study, series and instance rows the listener writes;
- :mod:`node.dicom.sockets`: the TCP options both set on their associations.
"""
