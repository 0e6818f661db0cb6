//! storedisk-builder (placeholder until its issue lands).
