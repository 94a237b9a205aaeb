"""regionspot-cache: RegionSpot with cached frozen SAM and CLIP features."""

__version__ = "0.1.0"
