"""The job table: models, store, migrations, storage layout. Imports nothing else of prefq."""
