from twisted.application.service import ServiceMaker

loom = ServiceMaker("loom", "loom.tap", "Loom: a server for live data streams", "loom")
