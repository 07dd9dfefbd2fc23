// Progressive enhancement only: every page works without this script.
(function () {
  "use strict";

  // Lets tests and CSS tell that the script (and so the relative asset URL) actually loaded.
  document.documentElement.dataset.js = "ok";

  // "guides/advanced", "guides/advanced/" and "guides/advanced/index.html" are the same page.
  function canonical(href) {
    var url = new URL(href, document.baseURI);
    return url.origin + url.pathname.replace(/index\.html$/, "").replace(/\/$/, "");
  }

  var here = canonical(window.location.href);
  var links = document.querySelectorAll(".sidebar a[href]");
  for (var i = 0; i < links.length; i++) {
    if (canonical(links[i].href) === here) {
      links[i].classList.add("current");
      links[i].setAttribute("aria-current", "page");
    }
  }
})();
