// Command hello is the demo's sample service: an HTTP server that says
// which site it runs at.
package main

import (
	"flag"
	"fmt"
	"log"
	"net/http"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:8000", "listen address")
	site := flag.String("site", "site-b", "name to greet with")
	flag.Parse()
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello from %s, through meshlink (you came from %s)\n", *site, r.RemoteAddr)
	})
	log.Printf("hello listening on http://%s", *listen)
	log.Fatal(http.ListenAndServe(*listen, nil))
}
