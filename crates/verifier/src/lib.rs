//! storedisk-verifier (placeholder until its issue lands).
