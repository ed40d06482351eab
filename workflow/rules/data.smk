# Demo data, ingest + QC, preprocessing, slice store, splits (owned by the data stage)
