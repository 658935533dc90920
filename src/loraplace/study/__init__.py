"""Study: runs as self-contained jobs (spec in, result out), an executor, and the result store."""
