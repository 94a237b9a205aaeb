from regionspot_cache.cli import main

main()
