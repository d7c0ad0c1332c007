"""darkstore student trainer: distill students from a store's cached soft targets."""
