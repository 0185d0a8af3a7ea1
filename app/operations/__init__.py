"""Operations: running the service. Health and metrics routes, start-up and migrations, local
mode, key rotation and replay, retention and erasure, reconciliation with the sender."""
