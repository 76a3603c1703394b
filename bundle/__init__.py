"""The bundle: one folder with a manifest, written by medblip-export and read by the runtime."""
