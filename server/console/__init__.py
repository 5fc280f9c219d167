"""The operator console (`/console`): server-rendered pages over the API, behind the same keys."""
